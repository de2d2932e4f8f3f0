"""Packaging for xai-audit: the `beam_pipeline` package and the `xai-audit` console script.

The pins name one stack that installs and works together on Python 3.11 (checked on CPU):
TensorFlow 2.21, Beam 2.77, TFMA 0.52, tfx-bsl 1.21. Workers on Dataflow install the same
package (``--setup_file ./setup.py``), so the pins are also what the workers run.
"""
import pathlib
import re

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).parent
VERSION = re.search(
    r'__version__ = "([^"]+)"', (HERE / "beam_pipeline" / "__init__.py").read_text()
).group(1)

setup(
    name="xai-audit",
    version=VERSION,
    description="Dataset-scale explainability and evaluation audit for Keras image classifiers",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["beam_pipeline", "beam_pipeline.*", "tfma_configs"]),
    package_data={"tfma_configs": ["*.pbtxt"], "beam_pipeline.report": ["templates/*.j2"]},
    python_requires=">=3.11,<3.12",
    install_requires=[
        "tensorflow==2.21.*",
        "tf-keras==2.21.*",
        "apache-beam[gcp]==2.77.*",
        "tensorflow-model-analysis==0.52.*",
        "tfx-bsl==1.21.*",
        "pyarrow>=14",
        "pandas>=2.0",
        "numpy>=1.26",
        "pillow>=10",
        "jinja2>=3.1,<4",
        "matplotlib>=3.8,<4",
    ],
    extras_require={"test": ["pytest>=8"]},
    entry_points={"console_scripts": ["xai-audit=beam_pipeline.cli:entry_point"]},
)
