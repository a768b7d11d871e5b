"""What Triton hands a Python-backend model's `initialize(args)`, read once for every adapter in export/triton/."""

import json


def config_parameters(args: dict) -> dict:
    """The model config's `parameters` as plain strings (Triton wraps each value as {"string_value": ...})."""
    return {k: v["string_value"] for k, v in json.loads(args["model_config"]).get("parameters", {}).items()}


def instance_device(args: dict) -> str:
    """The torch device of this model instance: its GPU for a KIND_GPU instance, else the CPU."""
    return f"cuda:{args['model_instance_device_id']}" if args.get("model_instance_kind") == "GPU" else "cpu"
