# The tensoryard registry as a Nomad service job, registered in Consul with a gRPC health check.
# deploy/nomad/README.md says what it needs from the Nomad clients and Consul.
#   nomad job run -var 'datacenters=["dc1"]' deploy/nomad/registry.nomad.hcl

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "tensoryard_bin" {
  description = "The tensoryard entry point of the installed virtual environment, on every client."
  type        = string
  default     = "/opt/tensoryard/venv/bin/tensoryard"
}

variable "data_dir" {
  description = "SQLite database, blobs and upload spool, on the node the registry is pinned to."
  type        = string
  default     = "/var/lib/tensoryard/registry"
}

variable "database_url" {
  description = "Empty: SQLite in data_dir (one registry). postgresql://... lets several registries share it."
  type        = string
  default     = ""
}

variable "blob_store" {
  description = "Empty: data_dir/blobs. s3://bucket/prefix for blobs shared by several registries."
  type        = string
  default     = ""
}

variable "tls_server_name" {
  description = "The DNS name every tensoryard server certificate carries; checked instead of the dynamic IP dialled."
  type        = string
  default     = "tensoryard.internal"
}

job "tensoryard-registry" {
  datacenters = var.datacenters
  type        = "service"

  group "registry" {
    # One, with SQLite on one node's disk; more only with database_url and blob_store shared, and
    # with --discovery consul:// (README.md): then the registries elect the one autoscaler that acts.
    count = 1

    constraint {
      attribute = "${meta.tensoryard_registry}"
      value     = "true"
    }

    network {
      # RegistryConfig.port: workers and routers are told this address.
      port "grpc" {
        static = 7070
      }
      port "metrics" {}
    }

    service {
      name     = "tensoryard-registry"
      provider = "consul"
      port     = "grpc"
      tags     = ["tensoryard", "grpc"]
      meta {
        metrics_port = "${NOMAD_PORT_metrics}"
      }

      check {
        name     = "grpc health"
        type     = "grpc"
        port     = "grpc"
        # The port is TLS. On an mTLS port the agent presents its own certificate
        # (enable_agent_tls_for_checks, deploy/consul/consul.hcl), so the job's tls_ca bundle must
        # include Consul's agent CA; the agent checks its own allocation and skips verifying it.
        grpc_use_tls    = true
        tls_skip_verify = true
        interval = "5s"
        timeout  = "2s"
      }
    }

    restart {
      attempts = 3
      interval = "5m"
      delay    = "2s"
      mode     = "delay"
    }

    task "registry" {
      driver = "raw_exec"
      user   = "tensoryard"

      config {
        command = var.tensoryard_bin
        args = [
          "registry",
          "--host", "${NOMAD_IP_grpc}",
          "--port", "${NOMAD_PORT_grpc}",
          "--metrics-port", "${NOMAD_PORT_metrics}",
          "--data-dir", var.data_dir,
          "--admin-token-file", "${NOMAD_SECRETS_DIR}/admin-token",
          # The autoscaler (services/autoscale/), acting through Nomad's job scale API on the worker
          # groups of workers.nomad.hcl, within each group's `scaling` block.
          "--autoscale", "nomad",
          # TLS (services/common/tls.py; README.md, "TLS"): mtls on this port, and mTLS to the others.
          "--tls-mode", "mtls",
          "--tls-cert", "${NOMAD_SECRETS_DIR}/tls/cert.pem",
          "--tls-key", "${NOMAD_SECRETS_DIR}/tls/key.pem",
          "--tls-client-ca", "${NOMAD_SECRETS_DIR}/tls/ca.pem",
          "--tls-ca", "${NOMAD_SECRETS_DIR}/tls/ca.pem",
          "--tls-server-name", var.tls_server_name,
        ]
      }

      # This job's certificate, key and the fleet's CA, from its Nomad Variable (README.md, "TLS"):
      #   nomad var put nomad/jobs/tensoryard-registry tls_cert=@cert.pem tls_key=@key.pem tls_ca=@ca.pem admin_token=... nomad_token=...
      template {
        destination = "secrets/tls/cert.pem"
        perms       = "0444"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-registry\" }}{{ .tls_cert }}{{ end }}"
      }

      template {
        destination = "secrets/tls/key.pem"
        perms       = "0400"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-registry\" }}{{ .tls_key }}{{ end }}"
      }

      template {
        destination = "secrets/tls/ca.pem"
        perms       = "0444"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-registry\" }}{{ .tls_ca }}{{ end }}"
      }

      env {
        TENSORYARD_DATABASE_URL = var.database_url
        TENSORYARD_BLOB_STORE   = var.blob_store
        TENSORYARD_LOG_FORMAT   = "json"
        # The `nomad` actuator: this node's agent, and a token allowed to scale tensoryard-workers
        # (a policy with `namespace "default" { capabilities = ["scale-job", "read-job"] }`).
        TENSORYARD_NOMAD_ADDRESS    = "http://${attr.unique.network.ip-address}:4646"
        TENSORYARD_NOMAD_TOKEN_FILE = "${NOMAD_SECRETS_DIR}/nomad-token"
      }

      template {
        destination = "secrets/nomad-token"
        perms       = "0400"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-registry\" }}{{ .nomad_token }}{{ end }}"
      }

      # The admin token, an item of the same Nomad Variable (one `nomad var put` replaces every item).
      template {
        destination = "secrets/admin-token"
        perms       = "0400"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-registry\" }}{{ .admin_token }}{{ end }}"
      }

      # SIGTERM: the registry stops taking calls and gives those in flight 2 s.
      kill_signal  = "SIGTERM"
      kill_timeout = "15s"

      resources {
        cpu    = 1000
        memory = 1024
      }
    }
  }
}
