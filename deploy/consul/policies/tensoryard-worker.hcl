# ACL policy for tensoryard workers: register (and deregister) themselves as tensoryard-worker,
# update their own checks, read the catalog and the scaling signals.
#   consul acl policy create -name tensoryard-worker -rules @tensoryard-worker.hcl
service "tensoryard-worker" {
  policy = "write"
}
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
key_prefix "tensoryard/deployments/" {
  policy = "read"
}
