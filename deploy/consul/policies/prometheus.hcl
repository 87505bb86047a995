# ACL policy for Prometheus' Consul service discovery (deploy/prometheus/prometheus-consul.yml).
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
