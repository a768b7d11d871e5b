# Production Triton image: the NGC server (native onnxruntime + TensorRT backends) plus what the
# email_classifier Python model imports (mailroute, tokenizers, faiss-gpu). The model repository is
# mounted, not baked in, so a new model version never needs a new image.
FROM nvcr.io/nvidia/tritonserver:24.10-py3

RUN pip install --no-cache-dir \
        "numpy==1.26.4" "tokenizers==0.23.3" "faiss-gpu-cu12==1.14.1.post1" "onnxruntime==1.32.0"
COPY pyproject.toml README.md /opt/mailroute/
COPY mailroute /opt/mailroute/mailroute
# only the serving core: training/export/client are not needed inside the server
RUN pip install --no-cache-dir --no-deps /opt/mailroute

HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD python3 -m mailroute.health http://localhost:8000 || exit 1
