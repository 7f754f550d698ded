"""megatron-offload: PipeOffload for Megatron-Core / Megatron-LM as a plugin."""
import ast
from pathlib import Path

from setuptools import find_packages, setup


def supported_range() -> str:
    """``SUPPORTED_RANGE`` of megatron_offload/releases.py, read without importing the package
    (the module is a leaf: the constant is a plain string literal)."""
    source = Path(__file__).resolve().parent / "megatron_offload" / "releases.py"
    for node in ast.parse(source.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(
                isinstance(target, ast.Name) and target.id == "SUPPORTED_RANGE"
                for target in node.targets):
            return ast.literal_eval(node.value)
    raise RuntimeError(f"no SUPPORTED_RANGE in {source}")


setup(
    name="megatron-offload",
    version="0.1.0",
    description=(
        "Pipeline-parallel activation offload (PipeOffload, ICML 2025) for "
        "Megatron-Core and Megatron-LM"
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_offload", "megatron_offload.*"]),
    # torch is deliberately not pinned here: GPU clusters bring their own CUDA build.
    # The CPU bootstrap (scripts/bootstrap.sh) pins torch==2.13.0. The supported megatron-core
    # releases are megatron_offload/releases.py's (checked again at install()); 0.17+ need
    # Python 3.12.
    install_requires=["torch>=2.4", f"megatron-core{supported_range()}", "numpy"],
    extras_require={
        "te": ["transformer-engine[pytorch]"],
        # NVIDIA apex is not on PyPI (the PyPI "apex" is an unrelated project): build it from
        # source on the cluster; this extra only records that the integration supports it.
        "apex": [],
        "viz": ["matplotlib>=3.7"],
        "test": ["pytest>=8", "pytest-timeout>=2.3", "hypothesis>=6.100", "matplotlib>=3.7"],
    },
    entry_points={"console_scripts": ["megatron-offload=megatron_offload.cli:main"]},
)
