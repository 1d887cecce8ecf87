"""An artifact N layers deep made from a shallower one by repeating its layers' graphs (copies: ORT refuses a
weights file with several hard links), for measuring a deep model's runtime memory and verify's without compiling every layer: the
sessions, their packing and the KV cache are a 28-layer model's; the values are the shallow model's layers again.

    python docs/probes/deepen_artifact.py r2 r2x28 28
"""
import hashlib
import re
import shutil
import sys
from pathlib import Path

import onnx
import yaml

source, target, layers = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
manifest = yaml.safe_load((source / "manifest.yaml").read_text())
shallow = manifest["model"]["num_layers"]
shutil.copytree(source, target, ignore=shutil.ignore_patterns("graphs", "verify.json"))
(target / "graphs").mkdir()
for f in (source / "graphs").iterdir():  # the shallow layers' files as they are
    shutil.copyfile(f, target / "graphs" / f.name)

layer_of = re.compile(r"\.(\d+)(?=\.|$)")  # attention.3, graphs/ffn.3.onnx, past_key.3


def renumbered(text: str, layer: int) -> str:
    return layer_of.sub(f".{layer}", text, count=1)


def deepen_graph(file: str, layer: int) -> str:
    """The graph file of `file`'s layer as layer `layer`: its per-layer input and output names renamed, its weights
    file copied under the new name."""
    new = renumbered(file, layer)
    model = onnx.load(source / file, load_external_data=False)
    old_index = layer_of.search(file).group(1)
    rename = {}
    for value in [*model.graph.input, *model.graph.output]:
        if value.name.endswith(f".{old_index}"):
            rename[value.name] = value.name[: -len(old_index)] + str(layer)
            value.name = rename[value.name]
    for node in model.graph.node:
        node.input[:] = [rename.get(n, n) for n in node.input]
        node.output[:] = [rename.get(n, n) for n in node.output]
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                data = renumbered(entry.value, layer)
                if not (target / "graphs" / data).exists():
                    shutil.copyfile(source / "graphs" / entry.value, target / "graphs" / data)
                entry.value = data
    onnx.save_model(model, target / new)
    return new


def deepen_spec(spec: dict, layer: int) -> dict:
    spec = yaml.safe_load(yaml.safe_dump(spec))  # a copy
    spec["name"] = renumbered(spec["name"], layer)
    spec["blocks"] = [renumbered(b, layer) for b in spec["blocks"]]
    for key in ("inputs", "outputs"):
        spec[key] = {renumbered(k, layer) if re.search(r"\.\d+$", k) else k: v for k, v in spec[key].items()}
    spec["file"] = deepen_graph(spec["file"], layer)
    if spec.get("dynamic"):
        spec["dynamic"] = deepen_graph(spec["dynamic"], layer)
    if spec.get("prefill"):
        spec["prefill"] = deepen_spec(spec["prefill"], layer) | {"name": spec["name"]}
    return spec


graphs = {g["name"]: g for g in manifest["graphs"]}
deep = [graphs["embed"]]
for layer in range(layers):
    for kind in ("attention", "ffn"):
        spec = graphs[f"{kind}.{layer % shallow}"]
        deep.append(spec if layer < shallow else deepen_spec(spec, layer))
deep.append(graphs["head"])
manifest["graphs"], manifest["schedule"] = deep, [g["name"] for g in deep]
manifest["model"]["num_layers"] = manifest["kv_cache"]["layers"] = layers
manifest["files"] = [
    {"path": str(p.relative_to(target)), "sha256": hashlib.sha256(p.read_bytes()).hexdigest(), "size": p.stat().st_size}
    for p in sorted(target.rglob("*")) if p.is_file() and p.name != "manifest.yaml"
]
(target / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
print(f"{target}: {layers} layers from {shallow}, {len(deep)} graphs")
