# A Consul client agent for a tensoryard node (every node that runs Nomad and tensoryard runs one;
# the servers are your Consul cluster's own). ACLs deny by default; RPC between agents is mutual
# TLS; the HTTP API is TLS to the network and plain HTTP on loopback only, for the local Nomad
# client, Prometheus and tensoryard processes.
#   consul agent -config-file=/etc/consul.d/consul.hcl
# Certificates: `consul tls ca create` and `consul tls cert create -client` (or your own CA).

datacenter = "dc1"
data_dir   = "/opt/consul/data"
log_level  = "INFO"
server     = false
retry_join = ["consul-server-1", "consul-server-2", "consul-server-3"]

# Binds to the node's private address; the HTTP API stays on loopback.
bind_addr   = "{{ GetPrivateIP }}"
client_addr = "127.0.0.1"

addresses {
  http  = "127.0.0.1"
  https = "0.0.0.0"
}

ports {
  http     = 8500
  https    = 8501
  grpc     = -1
  grpc_tls = 8503
}

acl {
  enabled                  = true
  default_policy           = "deny"
  down_policy              = "extend-cache"
  enable_token_persistence = true
  tokens {
    # Set with `consul acl set-agent-token agent <token>` (persisted), not here.
  }
}

tls {
  defaults {
    ca_file         = "/etc/consul.d/tls/consul-agent-ca.pem"
    cert_file       = "/etc/consul.d/tls/dc1-client-consul-0.pem"
    key_file        = "/etc/consul.d/tls/dc1-client-consul-0-key.pem"
    verify_incoming = true
    verify_outgoing = true
  }
  internal_rpc {
    verify_server_hostname = true
  }
  https {
    # Clients of the HTTPS API authenticate with ACL tokens; client certificates are optional.
    verify_incoming = false
  }
}

# Agents gossip encrypted too: `consul keygen`, the same key on every agent.
encrypt = "REPLACE-WITH-consul-keygen-OUTPUT"

# Health checks that Nomad registers (gRPC for tensoryard) run in this agent.
enable_script_checks = false
# tensoryard's registry and workers serve mTLS (deploy/nomad/README.md, "TLS"): the gRPC checks
# present this agent's certificate (tls.defaults), which tensoryard's client CA bundle must trust.
enable_agent_tls_for_checks = true
