"""A read-only root filesystem for the Kubeflow Pipelines steps, set at admission (`k8s/kfp/`).

kfp-kubernetes 2.17 sets only the user, group and non-root fields of a step's security context, so
the pipeline cannot ask for `readOnlyRootFilesystem` itself. Kubernetes' own MutatingAdmissionPolicy
(admissionregistration.k8s.io/v1, Kubernetes 1.36+) sets it on the `main` container (the step's
command; Argo's init and wait containers are KFP's and left alone) of every pod the pipeline labels
with STEP_LABEL. The writable paths are the emptyDirs every step mounts (pipelines/pipeline.py).
"""

from __future__ import annotations

STEP_LABEL = "clipforge.io/kfp-step"
POLICY = "clipforge-kfp-readonly-root"
_LABELS = {"app.kubernetes.io/name": "clipforge"}
# CEL, an apply configuration merged into the pod: containers merge by name, so only `main` changes.
_READ_ONLY_MAIN = ("Object{spec: Object.spec{containers: [Object.spec.containers{name: \"main\", "
                   "securityContext: Object.spec.containers.securityContext{readOnlyRootFilesystem: true}}]}}")


def readonly_root_policy() -> list[dict]:
    policy = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicy",
        "metadata": {"name": POLICY, "labels": dict(_LABELS)},
        "spec": {
            "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"],
                                                    "operations": ["CREATE"], "resources": ["pods"]}]},
            "matchConditions": [
                {"name": "clipforge-step",
                 "expression": f"has(object.metadata.labels) && '{STEP_LABEL}' in object.metadata.labels"},
                {"name": "has-main", "expression": "object.spec.containers.exists(c, c.name == 'main')"}],
            "failurePolicy": "Fail",  # a step that cannot be locked down does not start
            "reinvocationPolicy": "IfNeeded",
            "mutations": [{"patchType": "ApplyConfiguration",
                           "applyConfiguration": {"expression": _READ_ONLY_MAIN}}]}}
    binding = {
        "apiVersion": "admissionregistration.k8s.io/v1", "kind": "MutatingAdmissionPolicyBinding",
        "metadata": {"name": POLICY, "labels": dict(_LABELS)},
        "spec": {"policyName": POLICY}}
    return [policy, binding]
