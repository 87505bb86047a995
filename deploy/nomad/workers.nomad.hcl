# tensoryard workers: one task group per deployed model version, each registered in Consul with a
# gRPC health check (SERVING only while the model is loaded and its engine makes progress) and a
# `scaling` block that bounds what the registry's `nomad` actuator may set (services/autoscale/nomad.py:
# job "tensoryard-workers", group "<model>-v<version>" by default). Copy a group per model version.
#   nomad job run deploy/nomad/workers.nomad.hcl
# The registry's controller then owns each group's count (Nomad's Scale Task Group API); running
# this file again keeps the counts with `nomad job run -preserve-counts`.

variable "datacenters" {
  type    = list(string)
  default = ["dc1"]
}

variable "tensoryard_bin" {
  type    = string
  default = "/opt/tensoryard/venv/bin/tensoryard"
}

variable "cache_dir" {
  description = "Model files, content-addressed: one cache shared by every worker on a node."
  type        = string
  default     = "/var/cache/tensoryard/worker-cache"
}

variable "tls_server_name" {
  description = "The DNS name every tensoryard server certificate carries; checked instead of the dynamic IP dialled."
  type        = string
  default     = "tensoryard.internal"
}

job "tensoryard-workers" {
  datacenters = var.datacenters
  type        = "service"

  # Rolling updates one replica at a time. While such a deployment is active Nomad refuses scale
  # requests ("job scaling blocked due to active deployment"); the actuator retries with backoff.
  update {
    max_parallel     = 1
    health_check     = "checks"
    min_healthy_time = "10s"
    healthy_deadline = "10m"
    auto_revert      = true
  }

  group "all-MiniLM-L6-v2-v1" {
    count = 1

    scaling {
      enabled = true
      min     = 1
      max     = 8
    }

    network {
      port "grpc" {}
      port "metrics" {}
    }

    service {
      name     = "tensoryard-worker"
      provider = "consul"
      port     = "grpc"
      tags     = ["tensoryard", "grpc", "model=all-MiniLM-L6-v2", "version=1"]
      meta {
        model_name    = "all-MiniLM-L6-v2"
        model_version = "1"
        metrics_port  = "${NOMAD_PORT_metrics}"
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

    # Out of Consul first, then SIGTERM (the worker deregisters from the registry's discovery too).
    shutdown_delay = "2s"

    task "worker" {
      driver = "raw_exec"
      user   = "tensoryard"

      config {
        command = var.tensoryard_bin
        args = [
          "worker",
          "--model-name", "all-MiniLM-L6-v2",
          "--model-version", "1",
          "--host", "${NOMAD_IP_grpc}",
          "--port", "${NOMAD_PORT_grpc}",
          "--metrics-port", "${NOMAD_PORT_metrics}",
          "--cache-dir", var.cache_dir,
          "--admin-token-file", "${NOMAD_SECRETS_DIR}/admin-token",
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
      #   nomad var put nomad/jobs/tensoryard-workers tls_cert=@cert.pem tls_key=@key.pem tls_ca=@ca.pem admin_token=...
      template {
        destination = "secrets/tls/cert.pem"
        perms       = "0444"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-workers\" }}{{ .tls_cert }}{{ end }}"
      }

      template {
        destination = "secrets/tls/key.pem"
        perms       = "0400"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-workers\" }}{{ .tls_key }}{{ end }}"
      }

      template {
        destination = "secrets/tls/ca.pem"
        perms       = "0444"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-workers\" }}{{ .tls_ca }}{{ end }}"
      }

      env {
        TENSORYARD_LOG_FORMAT = "json"
      }

      template {
        destination = "local/registry.env"
        env         = true
        change_mode = "noop"
        data        = "{{ range $i, $s := service \"tensoryard-registry\" }}{{ if eq $i 0 }}TENSORYARD_REGISTRY_ADDRESS={{ $s.Address }}:{{ $s.Port }}{{ end }}{{ end }}\n"
      }

      template {
        destination = "secrets/admin-token"
        perms       = "0400"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-workers\" }}{{ .admin_token }}{{ end }}"
      }

      # SIGTERM drains (WorkerConfig.drain_timeout_s, 30 s, then the rest is cut off and resumed
      # elsewhere by the routers); kill_timeout is that grace plus 10 s before SIGKILL. Nomad caps
      # it at the client's max_kill_timeout (default 30s): raise that to at least 40s.
      kill_signal  = "SIGTERM"
      kill_timeout = "40s"

      resources {
        cpu    = 2000
        memory = 2048
      }
    }
  }

  group "SmolLM2-135M-Instruct-v1" {
    count = 1

    scaling {
      enabled = true
      min     = 1
      max     = 4
    }

    network {
      port "grpc" {}
      port "metrics" {}
    }

    service {
      name     = "tensoryard-worker"
      provider = "consul"
      port     = "grpc"
      tags     = ["tensoryard", "grpc", "model=SmolLM2-135M-Instruct", "version=1"]
      meta {
        model_name    = "SmolLM2-135M-Instruct"
        model_version = "1"
        metrics_port  = "${NOMAD_PORT_metrics}"
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

    shutdown_delay = "2s"

    task "worker" {
      driver = "raw_exec"
      user   = "tensoryard"

      config {
        command = var.tensoryard_bin
        args = [
          "worker",
          "--model-name", "SmolLM2-135M-Instruct",
          "--model-version", "1",
          "--host", "${NOMAD_IP_grpc}",
          "--port", "${NOMAD_PORT_grpc}",
          "--metrics-port", "${NOMAD_PORT_metrics}",
          "--cache-dir", var.cache_dir,
          "--admin-token-file", "${NOMAD_SECRETS_DIR}/admin-token",
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
      #   nomad var put nomad/jobs/tensoryard-workers tls_cert=@cert.pem tls_key=@key.pem tls_ca=@ca.pem admin_token=...
      template {
        destination = "secrets/tls/cert.pem"
        perms       = "0444"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-workers\" }}{{ .tls_cert }}{{ end }}"
      }

      template {
        destination = "secrets/tls/key.pem"
        perms       = "0400"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-workers\" }}{{ .tls_key }}{{ end }}"
      }

      template {
        destination = "secrets/tls/ca.pem"
        perms       = "0444"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-workers\" }}{{ .tls_ca }}{{ end }}"
      }

      env {
        TENSORYARD_LOG_FORMAT = "json"
      }

      template {
        destination = "local/registry.env"
        env         = true
        change_mode = "noop"
        data        = "{{ range $i, $s := service \"tensoryard-registry\" }}{{ if eq $i 0 }}TENSORYARD_REGISTRY_ADDRESS={{ $s.Address }}:{{ $s.Port }}{{ end }}{{ end }}\n"
      }

      template {
        destination = "secrets/admin-token"
        perms       = "0400"
        change_mode = "restart"
        data        = "{{ with nomadVar \"nomad/jobs/tensoryard-workers\" }}{{ .admin_token }}{{ end }}"
      }

      kill_signal  = "SIGTERM"
      kill_timeout = "40s"

      resources {
        cpu    = 4000
        memory = 4096
        # On a GPU node: device "nvidia/gpu" { count = 1 } and "--device", "cuda" in args.
      }
    }
  }
}
