import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402


# The heavy tier (`make test-slow`): modules that train for minutes, build real-size models, start
# Ray clusters, vLLM or several processes. Single tests elsewhere carry `@pytest.mark.slow` themselves.
SLOW_MODULES = {
    "data/test_prepare_kill.py", "data/test_prepare_ray.py", "evaluation/test_ray_inference.py",
    "inference/test_vllm_engine.py", "inference/test_reference_parity.py", "training/test_learning.py",
    "training/test_multiprocess.py", "training/test_resume_fault.py",
}


def pytest_collection_modifyitems(config, items):
    tests = os.path.dirname(__file__)
    for item in items:
        if os.path.relpath(str(item.path), tests).replace(os.sep, "/") in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def hang_guard(request):
    """Ends the run with every thread's traceback when a test outlives its module's LIMIT_S seconds
    (a Ray task retried forever would otherwise hang the suite)."""
    import faulthandler

    faulthandler.dump_traceback_later(request.module.LIMIT_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(scope="module")
def ray_instance(request):
    """A local 2-CPU Ray instance with a small object store, for one test module; the module's own
    functions (e.g. a task that kills its worker) travel to the workers by value."""
    ray = pytest.importorskip("ray")
    ray.cloudpickle.register_pickle_by_value(request.module)
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=200 * 1024 * 1024, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture()
def vllm_plugin_undone():
    """For tests that import `deepsynth.vllm.engine` in this (non-vLLM) process: the plugin's
    `register()` patches transformers' DeepseekOcr2Processor class for the whole process (as vLLM's
    processes need); the class is put back afterwards, so later tests see plain transformers."""
    from transformers import DeepseekOcr2Processor as cls

    import deepsynth.vllm as plugin

    saved, registered = dict(vars(cls)), plugin._DONE
    yield
    for name in set(vars(cls)) - set(saved):
        delattr(cls, name)
    for name, value in saved.items():
        if vars(cls).get(name) is not value:
            setattr(cls, name, value)
    plugin._DONE = registered  # so that a later register() patches the class again
