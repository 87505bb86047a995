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
        ]
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
