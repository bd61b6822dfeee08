"""`benchmarks.gpu_image_venv`: the rehearsal venv pins exactly the image's versions."""
from benchmarks.gpu_bundle import IMAGE_VERSIONS
from benchmarks.gpu_image_venv import install_commands


def test_every_package_the_image_brings_for_us_is_pinned_to_its_version():
    with_deps, no_deps, extra = install_commands("py")
    assert with_deps[-1] == f"torch=={IMAGE_VERSIONS['torch']}" and "--no-deps" not in with_deps  # its CUDA libraries
    pinned = dict(arg.split("==") for arg in no_deps if "==" in arg)
    assert "--no-deps" in no_deps
    assert pinned == {n: IMAGE_VERSIONS[n] for n in ("transformers", "huggingface-hub", "tokenizers", "accelerate",
                                                     "safetensors")}
    assert not any("==" in arg for arg in extra[5:])  # what the old transformers imports: any version
