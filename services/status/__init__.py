"""`tensoryard status`: models, versions, replicas and their live figures, read from the workers'
and routers' Prometheus pages (the families of docs/METRICS.md).

    scrape.py   discovery (where the workers are) and /metrics, fetched concurrently and parsed
    figures.py  rates and histogram quantiles from two snapshots: pure functions
    report.py   the report: per model and version, per replica, per router
    view.py     the rich tables
    command.py  the live loop, `--once`, `--json`

`tensoryard status --once --json` prints one StatusReport (report.py) as JSON. Rates are per
second over `window_s`; durations are seconds; a figure is null when it is not known: its family
is absent from the page, the page was unreachable, or (percentiles) nothing was observed in the
window.

    {
      "registry": "127.0.0.1:7070",
      "discovery_error": null,              # why the workers could not be listed, else null
      "window_s": 2.01,                     # between the two rounds of scrapes
      "taken_at_unix_s": 1764600000.0,      # the second round
      "models": [
        {
          "model": "all-MiniLM-L6-v2", "version": "1",
          "num_replicas": 1,                # listed in discovery
          "num_ready_replicas": 1,          # of them, tensoryard_worker_serving == 1 (null: unknown)
          "figures": {                      # the replicas' merged
            "requests_per_s": 12.5, "errors_per_s": 0.0,
            "latency_p50_s": 0.004, "latency_p99_s": 0.012,
            "ttft_p50_s": null, "ttft_p99_s": null,
            "tokens_per_s": null,
            "num_requests_waiting": 0.0,    # the engine's waiting queue or the batcher's
            "num_requests_running": null,
            "kv_cache_usage_perc": null     # 0..1
          },
          "replicas": [
            {
              "worker_id": "3fa2b1c0ab12", "address": "127.0.0.1:40123",
              "metrics_url": "http://127.0.0.1:40124/metrics",
              "reachable": true, "error": null,
              "phase": "ready",             # tensoryard_worker_phase; "unreachable"; null: unknown
              "serving": true,
              "figures": {...}              # as above, this replica's
            }
          ]
        }
      ],
      "routers": [
        {
          "metrics_url": "http://127.0.0.1:8002/metrics", "reachable": true, "error": null,
          "requests_per_s": 14.0, "errors_per_s": 0.0, "rejected_per_s": 0.0, "num_in_flight": 1.0,
          "models": [{"model": "...", "version": "1", "requests_per_s": 14.0, "errors_per_s": 0.0}]
        }
      ]
    }
"""
