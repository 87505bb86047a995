"""Gated promotion, canary splits and automatic rollback (docs/ARCHITECTURE.md, "Rollouts").

    gate.py        run a version's gate against its replicas (by explicit version), judge it
    promote.py     promote / rollback: deploy, wait, gate, then set the traffic split
    decision.py    the rollback decision: a pure function of two versions' windowed counts
    window.py      router metrics pages -> per-version counts over a sliding window
    guard.py       the rollback guard: runs in the registry, scrapes routers, rolls back
    controller.py  the local deployment controller (`tensoryard up`): desired vs running workers
    cli.py         `tensoryard models promote | gate | rollback`
"""
