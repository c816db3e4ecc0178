"""Ray job submission to a (KubeRay) cluster: submit, follow, stop and resume training runs.

``jobs.client`` finds the cluster and its token, ``jobs.submission`` builds and tracks the
jobs, ``jobs.cli`` is ``eerpipe job``. The manifests for the cluster itself are in ``k8s/``.
"""
