"""``vila-m3 vlm inspect | ask``: check a VILA checkpoint folder, or ask it about images from the shell.

``ask`` streams the answer to stdout. Volumes (NIfTI, NRRD, DICOM) are shown to the model as one
slice rendered as in a chat (the middle axial slice unless ``--slice`` is given); with ``--experts``
the prompt is the chat's first turn (model card and modality line), so the model may answer with a
trigger, which is printed, not run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def add_commands(commands: argparse._SubParsersAction) -> None:
    vlm = commands.add_parser("vlm", help="a VILA checkpoint: inspect it, or ask it about images")
    vlm_commands = vlm.add_subparsers(dest="vlm_command", required=True)
    inspect = vlm_commands.add_parser("inspect", help="check a checkpoint folder without loading its weights")
    inspect.add_argument("checkpoint", help="a VILA checkpoint folder (config.json, llm/, vision_tower/, mm_projector/)")
    inspect.set_defaults(handler=_inspect)

    ask = vlm_commands.add_parser("ask", help="ask the model a question about one or more images")
    ask.add_argument("checkpoint", help="a VILA checkpoint folder")
    ask.add_argument("question")
    ask.add_argument("--image", action="append", default=[], help="PNG/JPEG, or a volume (NIfTI, NRRD, DICOM folder)")
    ask.add_argument("--slice", type=int, help="slice index of a volume along --axis (default: the middle one)")
    ask.add_argument("--axis", default="axial", choices=["axial", "coronal", "sagittal"])
    ask.add_argument("--experts", action="store_true", help="prompt with the model card, as a chat's first turn")
    ask.add_argument("--template", help="conversation template (default: from the checkpoint)")
    ask.add_argument("--max-new-tokens", type=int, default=1024)
    ask.add_argument("--temperature", type=float, default=0.0)
    ask.set_defaults(handler=_ask)


def _inspect(args: argparse.Namespace) -> int:
    from vila_m3.vlm import CheckpointError, inspect_checkpoint

    try:
        info = inspect_checkpoint(args.checkpoint, require_tokenizer=True)
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    llm, vision = info.llm_config, info.vision_config
    print(f"VILA checkpoint {info.folder}")
    print(f"  LLM: {llm.get('architectures', ['?'])[0]}, hidden {llm.get('hidden_size')}, "
          f"{llm.get('num_hidden_layers')} layers, vocabulary {llm.get('vocab_size')}")
    print(f"  vision: hidden {vision.get('hidden_size')}, {vision.get('num_hidden_layers')} layers, "
          f"image {vision.get('image_size')} px, patch {vision.get('patch_size')}")
    print(f"  projector: {info.projector_config.get('mm_projector_type')}")
    stand_in = info.config.get("vila_m3_stand_in")
    if stand_in:
        print(f"  NOTE: {stand_in}")
    return 0


def _pictures(paths: list[str], axis: str, index: int | None) -> tuple[list, list[str]]:
    """PIL images for the model and the modality of each (``None`` for plain pictures)."""
    from PIL import Image

    from vila_m3.chat.study import detect_modality
    from vila_m3.imaging import read_volume
    from vila_m3.imaging.slices import render_slice, slice_index_count

    pictures, modalities = [], []
    for path in paths:
        if Path(path).suffix.lower() in IMAGE_SUFFIXES:
            with Image.open(path) as picture:
                pictures.append(picture.convert("RGB"))
            modalities.append("CXR")
            continue
        volume = read_volume(path)
        modality = detect_modality(volume)
        chosen = slice_index_count(volume, axis) // 2 if index is None else index
        pictures.append(render_slice(volume, axis, chosen, modality))
        modalities.append(modality)
    return pictures, modalities


def _ask(args: argparse.Namespace) -> int:
    from vila_m3.chat.study import StudyError
    from vila_m3.imaging import VolumeReadError
    from vila_m3.vlm import VilaChat, VlmError

    try:
        pictures, modalities = _pictures(args.image, args.axis, args.slice)
        model = VilaChat.from_pretrained(args.checkpoint, template=args.template)
    except (VlmError, VolumeReadError, StudyError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if model.is_stand_in:
        print("NOTE: this checkpoint holds tiny random weights for tests; its words mean nothing.", file=sys.stderr)
    prompt = args.question
    if "<image>" not in prompt:
        lines = [f"<image>This is a {m} image.\n" if args.experts else "<image>\n" for m in modalities]
        prompt = "".join(lines) + prompt
    if args.experts:
        from vila_m3.experts.registry import ExpertRegistry

        card = ExpertRegistry.from_config(available=lambda spec: None if spec.runner else "not run").model_card()
        prompt = card + prompt
    try:
        result = model.generate([("user", prompt)], pictures, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, stream=lambda piece: print(piece, end="", flush=True))
    except VlmError as err:
        print(f"\nerror: {err}", file=sys.stderr)
        return 2
    print()
    print(f"[{result.n_tokens} tokens, {result.seconds:.2f} s, stopped by {result.stopped_by}]", file=sys.stderr)
    return 0
