"""The deployment controller's autoscaling: signals in, desired replicas out, applied by an actuator."""
