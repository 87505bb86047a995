# tensoryard routers (the front door) as a Nomad service job, registered in Consul with a gRPC
# health check that passes once every model in `models` has a ready replica.
#   nomad job run -var 'models=all-MiniLM-L6-v2,SmolLM2-135M-Instruct' deploy/nomad/router.nomad.hcl

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "tensoryard_bin" {
  type    = string
  default = "/opt/tensoryard/venv/bin/tensoryard"
}

variable "models" {
  description = "Models the routers serve, comma-separated: a router is healthy only while each has a replica."
  type        = string
  default     = ""
}

variable "count" {
  type    = number
  default = 2
}

variable "tls_server_name" {
  description = "The DNS name every tensoryard server certificate carries; checked instead of the dynamic IP dialled."
  type        = string
  default     = "tensoryard.internal"
}

job "tensoryard-router" {
  datacenters = var.datacenters
  type        = "service"

  group "router" {
    count = var.count

    # One router per node: they share RouterConfig.port as a static port.
    constraint {
      operator = "distinct_hosts"
      value    = "true"
    }

    network {
      # RouterConfig.port, the port clients are given.
      port "grpc" {
        static = 8001
      }
      port "metrics" {}
    }

    service {
      name     = "tensoryard-router"
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

    # Out of Consul first, so load balancers that follow it stop sending, then SIGTERM.
    shutdown_delay = "2s"

    update {
      max_parallel     = 1
      health_check     = "checks"
      min_healthy_time = "10s"
      healthy_deadline = "5m"
      auto_revert      = true
    }

    task "router" {
      driver = "raw_exec"
      user   = "tensoryard"

      config {
        command = var.tensoryard_bin
        args = [
          "router",
          "--host", "${NOMAD_IP_grpc}",
          "--port", "${NOMAD_PORT_grpc}",
          "--metrics-port", "${NOMAD_PORT_metrics}",
          # TLS (services/common/tls.py; README.md, "TLS"): tls on this port, and mTLS to the others.
          "--tls-mode", "tls",
          "--tls-cert", "${NOMAD_SECRETS_DIR}/tls/cert.pem",
          "--tls-key", "${NOMAD_SECRETS_DIR}/tls/key.pem",
          "--tls-ca", "${NOMAD_SECRETS_DIR}/tls/ca.pem",
          "--tls-server-name", var.tls_server_name,
        ]
      }

      # This job's certificate, key and the fleet's CA, from its Nomad Variable (README.md, "TLS"):
      #   nomad var put nomad/jobs/tensoryard-router tls_cert=@cert.pem tls_key=@key.pem tls_ca=@ca.pem
      template {
        destination = "secrets/tls/cert.pem"
        perms       = "0444"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-router\" }}{{ .tls_cert }}{{ end }}"
      }

      template {
        destination = "secrets/tls/key.pem"
        perms       = "0400"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-router\" }}{{ .tls_key }}{{ end }}"
      }

      template {
        destination = "secrets/tls/ca.pem"
        perms       = "0444"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-router\" }}{{ .tls_ca }}{{ end }}"
      }

      env {
        TENSORYARD_MODELS     = var.models
        TENSORYARD_LOG_FORMAT = "json"
      }

      # The registry's address from Consul's catalog (its first passing instance).
      template {
        destination = "local/registry.env"
        env         = true
        change_mode = "noop"
        data        = "{{ range $i, $s := service \"tensoryard-registry\" }}{{ if eq $i 0 }}TENSORYARD_REGISTRY_ADDRESS={{ $s.Address }}:{{ $s.Port }}{{ end }}{{ end }}\n"
      }

      # SIGTERM drains: NOT_SERVING, new calls refused, in-flight ones get drain_timeout_s
      # (RouterConfig, 30 s); kill_timeout is that grace plus 10 s before SIGKILL. Nomad caps it
      # at the client's max_kill_timeout (default 30s): raise that to at least 40s.
      kill_signal  = "SIGTERM"
      kill_timeout = "40s"

      resources {
        cpu    = 2000
        memory = 1024
      }
    }
  }
}
