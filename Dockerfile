# Dataflow custom container for xai-audit (README, "Run on Dataflow").
#
# The base image is Beam's own Python 3.11 SDK container for the Beam version setup.py pins, so
# its boot entrypoint (/opt/apache/beam/boot) starts the SDK worker as Dataflow expects; this
# file adds the package and its pinned requirements and does not override ENTRYPOINT.
#
#   docker build -t REGION-docker.pkg.dev/PROJECT/REPO/xai-audit:0.1.0 .
#   docker push REGION-docker.pkg.dev/PROJECT/REPO/xai-audit:0.1.0
FROM apache/beam_python3.11_sdk:2.77.0

WORKDIR /opt/xai-audit
COPY setup.py README.md ./
COPY beam_pipeline ./beam_pipeline
COPY tfma_configs ./tfma_configs

# install_requires pins TensorFlow, TFMA, tfx-bsl and Beam itself (2.77.*, already in the base
# image, so pip keeps it). The check fails the build if pip replaced the SDK the image boots.
RUN pip install --no-cache-dir . \
 && python -c "import apache_beam, beam_pipeline, tensorflow_model_analysis; \
assert apache_beam.__version__ == '2.77.0', apache_beam.__version__"
