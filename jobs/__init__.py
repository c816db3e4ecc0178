"""Ray job submission to a (KubeRay) cluster."""
