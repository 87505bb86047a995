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

job "tensoryard-registry" {
  datacenters = var.datacenters
  type        = "service"

  group "registry" {
    # One, with SQLite on one node's disk; more only with database_url and blob_store shared.
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
        ]
      }

      env {
        TENSORYARD_DATABASE_URL = var.database_url
        TENSORYARD_BLOB_STORE   = var.blob_store
        TENSORYARD_LOG_FORMAT   = "json"
      }

      # The admin token from a Nomad Variable (nomad var put nomad/jobs/tensoryard-registry admin_token=...).
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
