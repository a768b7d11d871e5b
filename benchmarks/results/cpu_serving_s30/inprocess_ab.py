# In-process ONNX classifier of one repository, K=10, batches of 8 (what triton_load compares the server with):
# current arm: python inprocess_ab.py runs/bench-repo-s30 from this checkout; base arm: from $BASE with PYTHONPATH=$BASE
# (else the editable install imports this checkout's mailroute): PYTHONPATH=$BASE .venv/bin/python <this file> runs/bench-repo-base
import sys, time
from benchmarks.inputs import banking77_texts, email_texts
from mailroute.repository import open_onnx_classifier
clf = open_onnx_classifier(sys.argv[1])
for name, texts in (("b77", banking77_texts(512)), ("email", email_texts(512))):
    clf.classify(texts[:8], top_k=10)
    n = 128 if name == "email" else 256
    t = time.perf_counter()
    for s in range(0, n, 8):
        clf.classify(texts[s:s + 8], top_k=10)
    print(name, round(n / (time.perf_counter() - t), 3), flush=True)
