import pytest
from k8skit import DIRS, kustomize, ours

from tests.conftest import which


@pytest.fixture(scope="session")
def built() -> dict[str, list[dict]]:
    """Our objects from every kustomize directory, built once with the real kubectl."""
    kubectl = which("kubectl")
    return {rel: ours(kustomize(kubectl, rel)) for rel in DIRS}
