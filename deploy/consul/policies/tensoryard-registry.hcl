# ACL policy for the registry and its deployment controller: register itself, write the scaling
# signals under tensoryard/, and hold the controller's leader lock (a session on its own node).
service "tensoryard-registry" {
  policy = "write"
}
service_prefix "" {
  policy = "read"
}
node_prefix "" {
  policy = "read"
}
key_prefix "tensoryard/" {
  policy = "write"
}
session_prefix "" {
  policy = "write"
}
