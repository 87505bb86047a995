# ACL policy for tensoryard routers: follow the workers' health (blocking queries on
# /v1/health/service/tensoryard-worker), register themselves as tensoryard-router, and write the
# requests they hold for a deployment scaled to zero under
# tensoryard/deployments/<model>/<version>/held/<router id> (services/common/scaling_keys.py).
# Consul's rules match key prefixes only, so that grant covers the deployments' other keys too
# (the autoscaler's decisions); the leader lock under tensoryard/autoscaler/ stays read-only.
service "tensoryard-router" {
  policy = "write"
}
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
key_prefix "tensoryard/" {
  policy = "read"
}
key_prefix "tensoryard/deployments/" {
  policy = "write"
}
