# Production Triton image: the NGC server (native onnxruntime + TensorRT backends) plus what the
# email_classifier Python model imports (mailroute, tokenizers, faiss-gpu). The model repository is
# mounted, not baked in, so a new model version never needs a new image.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

# pins resolved for the image's Python 3.10 (tests/test_service_configs.py resolves them with pip):
# faiss-gpu-cu12 1.14 needs numpy 2; onnxruntime 1.23.2 is the last release with cp310 wheels
RUN pip install --no-cache-dir \
        "numpy==2.2.6" "tokenizers==0.23.3" "faiss-gpu-cu12==1.14.1.post1" "onnxruntime==1.23.2"
COPY pyproject.toml README.md /opt/mailroute/
COPY mailroute /opt/mailroute/mailroute
# only the serving core: training/export/client are not needed inside the server
RUN pip install --no-cache-dir --no-deps /opt/mailroute

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=5 \
    CMD python3 -m mailroute.health http://localhost:8000 || exit 1
