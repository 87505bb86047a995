# ACL policy for tensoryard routers: follow the workers' health (blocking queries on
# /v1/health/service/tensoryard-worker) and register themselves as tensoryard-router.
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
