"""One decoder layer's stored tensors ⇄ canonical roles: the one adapter between a checkpoint's names and layouts and
the pure functions of netmorph/ops. Every surgery (diff, grow, qkv_layout) reads and writes layers through it:
reader → `LayerView.read` → pure op → `LayerView.store` → writer.

Canonical form: `"<role>.<kind>"` keys — the roles of `ROLE_SPACES` in netmorph/ops/roles.py ("q", "k", "v",
"o", "gate", "up", "down", the norms), kind "weight" or "bias" — with weights in nn.Linear orientation `[out, in]`.
Reading splits a fused q/k/v tensor by its layout (netmorph/ops/qkv_layout.py), splits Phi-3's `gate_up_proj`
(rows [gate; up], as `Phi3MLP` chunks its output) and transposes GPT-2's Conv1D weights (stored `[in, out]`);
storing does the inverse. Only row permutations, concatenations and transposes: every bit is kept.
"""

from dataclasses import dataclass

import torch

from netmorph.arch.families import ArchSpec
from netmorph.errors import NetmorphError
from netmorph.io.reader import TensorReader
from netmorph.ops import qkv_layout
from netmorph.ops.qkv_layout import Heads

KINDS = ("weight", "bias")
MISMATCH = "the weights and config.json do not belong together"


@dataclass(frozen=True)
class LayerView:
    """The layers of one checkpoint as `spec` stores them, with `heads` query / key-value heads of `head_dim` dims.

    layout: the layout of the stored q/k/v (default: the family's `qkv_layout`); qkv_names: the stored names of the
    q/k/v tensors relative to the layer prefix, one for a fused tensor or three (default: the family's). Both differ
    from the family's only for what `netmorph qkv-layout` writes in a layout no stock class reads."""

    spec: ArchSpec
    heads: Heads
    head_dim: int | None = None
    layout: str | None = None
    qkv_names: tuple[str, ...] | None = None

    @property
    def qkv_layout(self) -> str:
        """The layout of the stored q/k/v: `layout`, else the family's `qkv_layout` (one of QKV_LAYOUTS)."""
        return self.layout or self.spec.qkv_layout

    @property
    def roles(self) -> dict[str, str]:
        """Stored name (relative to the layer prefix, without `.weight`/`.bias`) → role; "qkv" and "gate_up" name
        fused tensors."""
        tensors = self.spec.tensors
        qkv = self.qkv_names or ((tensors["qkv"],) if "qkv" in tensors else tuple(tensors[role] for role in "qkv"))
        names = {suffix: role for role, suffix in tensors.items() if role not in ("q", "k", "v", "qkv")}
        names.update({qkv[0]: "qkv"} if len(qkv) == 1 else dict(zip(qkv, "qkv")))
        return names

    @property
    def fused_qkv(self) -> bool:
        """Whether q/k/v are stored as one fused tensor (one name in `qkv_names`, or the family's "qkv" role)."""
        return "qkv" in self.roles.values()

    def stored_role(self, role: str) -> str:
        """The role of the stored tensor that holds a canonical role: "qkv" / "gate_up" for a fused one, else itself."""
        if role in ("q", "k", "v") and self.fused_qkv:
            return "qkv"
        if role in ("gate", "up") and "gate_up" in self.spec.tensors:
            return "gate_up"
        return role

    def stored_name(self, layer_idx: int, role: str, kind: str) -> str:
        """The full stored name of a canonical role's tensor (the fused tensor's name for a fused role)."""
        stored_role = self.stored_role(role)
        suffix = next(name for name, r in self.roles.items() if r == stored_role)
        return f"{self.spec.layer_prefix.format(i=layer_idx)}{suffix}.{kind}"

    def read(self, reader: TensorReader, layer_idx: int, roles: tuple[str, ...] | None = None,
             dtype: torch.dtype | None = None, names: list[str] | None = None) -> tuple[dict, dict]:
        """(canonical tensors of layer `layer_idx`, its tensors of no known role by name relative to the prefix).

        roles: the canonical roles to read (default all; a fused tensor is read whole when one of its parts is
        asked for); dtype: convert each stored tensor to it first (float64 for growth arithmetic); names: the
        layer's full stored names to consider (default: every known one present in `reader`). A tensor that is
        absent is simply not in the result: `require` names it. Raises NetmorphError when a fused q/k/v tensor does
        not have the rows `heads` × `head_dim` imply."""
        prefix = self.spec.layer_prefix.format(i=layer_idx)
        known = self.roles
        wanted = None if roles is None else set(roles)
        if wanted is not None and wanted & {"q", "k", "v"}:
            wanted.add("qkv")
        if wanted is not None and wanted & {"gate", "up"}:
            wanted.add("gate_up")
        if names is None:
            names = [f"{prefix}{suffix}.{kind}" for suffix in known for kind in KINDS]
            names = [name for name in names if name in reader]
        stored, extras = {}, {}
        for name in names:
            suffix, _, kind = name[len(prefix):].rpartition(".")
            role = known.get(suffix)
            if role is None:
                extras[name[len(prefix):]] = reader.get(name)
            elif wanted is None or role in wanted:
                tensor = reader.get(name)
                stored[f"{role}.{kind}"] = tensor if dtype is None else tensor.to(dtype)
        return self._canonical(stored, layer_idx), extras

    def store(self, layer: dict[str, torch.Tensor], layer_idx: int) -> dict[str, torch.Tensor]:
        """Canonical tensors → {full stored name: tensor}, fused and transposed as this view stores them (the
        inverse of `read`; tensors may be views of the inputs)."""
        layer = dict(layer)
        for kind in KINDS:
            if self.fused_qkv and f"q.{kind}" in layer:
                q, k, v = (layer.pop(f"{role}.{kind}") for role in "qkv")
                layer[f"qkv.{kind}"] = qkv_layout.fuse(q, k, v, self.qkv_layout, self.heads)
            if "gate_up" in self.spec.tensors and f"gate.{kind}" in layer:
                layer[f"gate_up.{kind}"] = torch.cat([layer.pop(f"gate.{kind}"), layer.pop(f"up.{kind}")], dim=0)
        prefix = self.spec.layer_prefix.format(i=layer_idx)
        suffix_of = {role: suffix for suffix, role in self.roles.items()}
        return {f"{prefix}{suffix_of[key.split('.')[0]]}.{key.split('.')[1]}": self._oriented(key, tensor)
                for key, tensor in layer.items()}

    def require(self, layer: dict[str, torch.Tensor], roles: tuple[str, ...], layer_idx: int) -> None:
        """Raise NetmorphError naming the first absent weight of `roles`, or q/k/v biases that are not all present
        or all absent."""
        for role in roles:
            if f"{role}.weight" not in layer:
                raise NetmorphError(f"the checkpoint has no {self.stored_name(layer_idx, role, 'weight')}: it is "
                                    f"incomplete or not a {self.spec.model_type} model")
        biases = [role for role in "qkv" if f"{role}.bias" in layer]
        if biases and len(biases) != 3:
            missing = next(role for role in "qkv" if role not in biases)
            raise NetmorphError(f"the checkpoint has {self.stored_name(layer_idx, biases[0], 'bias')} but no "
                                f"{self.stored_name(layer_idx, missing, 'bias')}: q, k and v need all or no biases")

    def check_shapes(self, layer: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], layer_idx: int) -> None:
        """Raise NetmorphError naming the first canonical tensor whose shape is not `expected[key]` (a
        `"role.kind"` key), by its stored name."""
        for key, shape in expected.items():
            if key in layer and tuple(layer[key].shape) != shape:
                role, kind = key.split(".")
                name = self.stored_name(layer_idx, role, kind)
                what = f"{name} holds a {role} part that" if self.stored_role(role) != role else name
                raise NetmorphError(f"{what} has shape {tuple(layer[key].shape)} but config.json implies {shape}: "
                                    f"{MISMATCH}")

    def _canonical(self, stored: dict[str, torch.Tensor], layer_idx: int) -> dict[str, torch.Tensor]:
        layer = {key: self._oriented(key, tensor) for key, tensor in stored.items()}
        for kind in KINDS:
            if f"qkv.{kind}" in layer:
                fused = layer.pop(f"qkv.{kind}")
                if self.head_dim is not None:
                    rows = (self.heads.num_heads + 2 * self.heads.num_kv_heads) * self.head_dim
                    if fused.shape[0] != rows:
                        raise NetmorphError(f"{self.stored_name(layer_idx, 'qkv', kind)} has {fused.shape[0]} rows "
                                            f"but config.json implies {rows}: {MISMATCH}")
                parts = qkv_layout.split(fused, self.qkv_layout, self.heads)
                layer.update({f"{role}.{kind}": part for role, part in zip("qkv", parts)})
            if f"gate_up.{kind}" in layer:
                layer[f"gate.{kind}"], layer[f"up.{kind}"] = layer.pop(f"gate_up.{kind}").chunk(2, dim=0)
        return layer

    def _oriented(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """GPT-2's Conv1D weights are stored `[in, out]`: transposed between the stored and the canonical form (the
        separate q/k/v of a fused Conv1D family as well)."""
        role, kind = key.split(".")
        transposed = set(self.spec.transposed) | ({"q", "k", "v"} if "qkv" in self.spec.transposed else set())
        return tensor.T if kind == "weight" and role in transposed else tensor
