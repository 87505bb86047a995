// The CUDA batching core: a step's flat batch built on the GPU in one launch (kernels/batch_core.py).
//
// Input: `desc`, the step description the host packed into one int32 array and copied in one transfer
// (layout written by StepDescription.from_lists; B sequences, S of which sample):
//   desc[0 .. B)          slots          row of the persistent buffers that holds sequence b
//   desc[B .. 2B)         num_computed   tokens of b already in the cache
//   desc[2B .. 3B)        num_new        tokens of b computed this step (>= 1)
//   desc[3B .. 4B)        sample         1 when b's last new token is sampled
//   desc[4B .. 5B + 1)    cu_seqlens     exclusive prefix sum of num_new (the host knows num_new)
//   desc[5B + 1 .. +S)    logits rows    cu_seqlens[b + 1] - 1 of each sampling b, in batch order
// and the persistent buffers: token_ids [max_slots, max_len] (int32 or int64, one kernel each) and
// block_tables [max_slots, max_blocks] int32, both addressed through element strides.
//
// One thread per output element, in five consecutive ranges of the grid:
//   [0, N)                      token t: its sequence by binary search over cu_seqlens, then
//                               input_ids / positions / slot_mapping[t]
//   [N, N + B * max_blocks)     one int32 of the gathered block tables [B, max_blocks]
//   next B + 1                  cu_seqlens_q
//   next B                      context_lens = num_computed + num_new
//   next S                      logits_indices (int64)
// No shared memory and no barriers: every thread writes one element from global reads only, so the
// ranges need no ordering among themselves. cu_seqlens is at most a few hundred ints and stays in L1.

template <typename TokenT>
__device__ __forceinline__ void build_flat_batch(
    const int* __restrict__ desc, int num_seqs, int num_sampled, int num_tokens,
    const TokenT* __restrict__ token_ids, long long token_row_stride, long long token_col_stride,
    const int* __restrict__ block_tables, long long table_row_stride, long long table_col_stride,
    int max_blocks, int block_size,
    long long* __restrict__ input_ids, long long* __restrict__ positions, long long* __restrict__ slot_mapping,
    int* __restrict__ cu_seqlens_q, int* __restrict__ context_lens, int* __restrict__ out_block_tables,
    long long* __restrict__ logits_indices) {
  const int* slots = desc;
  const int* num_computed = desc + num_seqs;
  const int* num_new = desc + 2 * num_seqs;
  const int* cu_seqlens = desc + 4 * num_seqs;
  const int* logits_rows = desc + 5 * num_seqs + 1;

  long long t = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (t < num_tokens) {
    // The last b with cu_seqlens[b] <= t; cu_seqlens is strictly increasing since num_new >= 1.
    int lo = 0, hi = num_seqs - 1;
    while (lo < hi) {
      int mid = (lo + hi + 1) >> 1;
      if (cu_seqlens[mid] <= t) lo = mid; else hi = mid - 1;
    }
    long long slot = slots[lo];
    long long pos = num_computed[lo] + (t - cu_seqlens[lo]);
    input_ids[t] = (long long)token_ids[slot * token_row_stride + pos * token_col_stride];
    positions[t] = pos;
    long long block = block_tables[slot * table_row_stride + (pos / block_size) * table_col_stride];
    slot_mapping[t] = block * block_size + pos % block_size;
    return;
  }
  t -= num_tokens;
  long long table_elements = (long long)num_seqs * max_blocks;
  if (t < table_elements) {
    long long b = t / max_blocks, j = t % max_blocks;
    out_block_tables[t] = block_tables[slots[b] * table_row_stride + j * table_col_stride];
    return;
  }
  t -= table_elements;
  if (t <= num_seqs) {
    cu_seqlens_q[t] = cu_seqlens[t];
    return;
  }
  t -= num_seqs + 1;
  if (t < num_seqs) {
    context_lens[t] = num_computed[t] + num_new[t];
    return;
  }
  t -= num_seqs;
  if (t < num_sampled) logits_indices[t] = logits_rows[t];
}

#define BATCH_CORE_ENTRY(NAME, TOKEN_T)                                                                    \
  extern "C" __global__ void NAME(                                                                        \
      const int* desc, int num_seqs, int num_sampled, int num_tokens, const TOKEN_T* token_ids,           \
      long long token_row_stride, long long token_col_stride, const int* block_tables,                    \
      long long table_row_stride, long long table_col_stride, int max_blocks, int block_size,             \
      long long* input_ids, long long* positions, long long* slot_mapping, int* cu_seqlens_q,             \
      int* context_lens, int* out_block_tables, long long* logits_indices) {                              \
    build_flat_batch<TOKEN_T>(desc, num_seqs, num_sampled, num_tokens, token_ids, token_row_stride,      \
                              token_col_stride, block_tables, table_row_stride, table_col_stride,         \
                              max_blocks, block_size, input_ids, positions, slot_mapping, cu_seqlens_q,   \
                              context_lens, out_block_tables, logits_indices);                            \
  }

BATCH_CORE_ENTRY(build_flat_batch_i32, int)
BATCH_CORE_ENTRY(build_flat_batch_i64, long long)
