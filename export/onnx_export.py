"""PyTorch encoders -> ONNX, with the interface of mailroute.contract and a parity check.

The bi-encoder graph contains mean pooling and L2 normalisation (sentence-transformers' own export
leaves them out), so the served embedding is exactly the one the label index was built with. The
cross-encoder graph outputs the raw logit: no sigmoid, the softmax over K happens in the pipeline.
"""

import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from mailroute import contract
from mailroute.pipeline import load_tokenizer, tensors
from mailroute.settings import DEFAULTS
from mailroute.torch_encoders import mean_pool_normalise

OPSET = 17
PARITY_ATOL = 1e-4  # max |onnx - torch| allowed on embeddings and logits (fp32)


class ParityError(RuntimeError):
    pass


class BiEncoderGraph(torch.nn.Module):
    def __init__(self, bert):
        super().__init__()
        self.bert = bert

    def forward(self, input_ids, attention_mask):
        out = self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (n, seq, dim)
        return mean_pool_normalise(out, attention_mask)  # (n, dim)


class CrossEncoderGraph(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids):
        return self.model(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).logits  # (n, 1)


def _export(graph, sample: tuple, inputs: tuple, output: str, path: Path):
    dynamic = {name: {0: "batch", 1: "sequence"} for name in inputs} | {output: {0: "batch"}}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph.eval(), tuple(torch.from_numpy(x) for x in sample), str(path), input_names=list(inputs),
                          output_names=[output], dynamic_axes=dynamic, opset_version=OPSET, dynamo=False)


def optimize_transformer(path: Path, hf_config) -> None:
    """onnxruntime's transformer optimizer: fuses attention, LayerNorm and GELU into single kernels
    (the generic graph optimizations of a session do not). Rewrites the file in place."""
    from onnxruntime.transformers.optimizer import optimize_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = optimize_model(str(path), model_type="bert", num_heads=hf_config.num_attention_heads,
                               hidden_size=hf_config.hidden_size, opt_level=1)
    model.save_model_to_file(str(path))


def _parity(graph, path: Path, sample: tuple, inputs: tuple, what: str, atol: float) -> float:
    with torch.no_grad():
        ref = graph(*(torch.from_numpy(x) for x in sample)).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, dict(zip(inputs, sample)))[0]
    diff = float(np.max(np.abs(got - ref)))
    if not diff <= atol:
        raise ParityError(f"{what}: ONNX differs from PyTorch by {diff:.2e} (max abs), over the {atol:.0e} tolerance")
    return diff


def export_bi_encoder(st_model, tokenizer_json, path, texts: list, atol: float = PARITY_ATOL, optimize: bool = True,
                      name: str = contract.BI_ENCODER) -> float:
    """SentenceTransformer -> ONNX (input_ids, attention_mask) -> embedding. Returns the parity max diff
    (of the final, optimized graph). name: the model it becomes (the flat encoder is exported the same way), which a
    parity failure names."""
    graph = BiEncoderGraph(st_model[0].auto_model)
    ids, mask, _ = tensors(load_tokenizer(tokenizer_json, DEFAULTS.max_email_tokens).encode_batch(texts))
    _export(graph, (ids, mask), contract.BI_ENCODER_INPUTS, contract.EMBEDDING, Path(path))
    if optimize:
        optimize_transformer(Path(path), graph.bert.config)
    return _parity(graph, Path(path), (ids, mask), contract.BI_ENCODER_INPUTS, name, atol)


def export_cross_encoder(cross_model, tokenizer_json, path, pairs: list, atol: float = PARITY_ATOL, optimize: bool = True) -> float:
    """CrossEncoder -> ONNX (input_ids, attention_mask, token_type_ids) -> logit. Returns the parity max diff
    (of the final, optimized graph)."""
    graph = CrossEncoderGraph(cross_model.model)
    sample = tensors(load_tokenizer(tokenizer_json, DEFAULTS.max_pair_tokens).encode_batch(pairs))
    _export(graph, sample, contract.CROSS_ENCODER_INPUTS, contract.LOGIT, Path(path))
    if optimize:
        optimize_transformer(Path(path), graph.model.config)
    return _parity(graph, Path(path), sample, contract.CROSS_ENCODER_INPUTS, contract.CROSS_ENCODER, atol)


def quantize_int8(src, dst) -> None:
    """Dynamic int8 quantisation of the weights (CPU serving); accuracy change is measured by the caller."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # the fused graph has com.microsoft ops that shape inference cannot type: their outputs are fp32
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
