"""kvtransfer as an SGLang disaggregation backend: ``--disaggregation-transfer-backend
kvtransfer``, with no SGLang fork.

The package's ``sglang.srt.plugins`` entry point (:func:`plugin`) runs in every SGLang process
before the server arguments are parsed. It registers the name ``kvtransfer`` in three steps:

1. adds it to the argument choices (``add_disagg_transfer_backend_choices``, SGLang's
   extension hook);
2. adds a ``KVTRANSFER`` member to the closed ``TransferBackend`` enum (the one step that
   relies on ``Enum`` internals: ``_member_map_``, ``_value2member_map_``,
   ``_member_names_``);
3. wraps ``sglang.srt.disaggregation.utils.get_kv_class`` (an AROUND hook of SGLang's
   ``HookRegistry``, which also rebinds modules that imported it) so the name resolves to
   the classes in :mod:`kvtransfer.sglang.conn`.

Importing this package does not import SGLang; :func:`plugin` does nothing where SGLang is
not installed.
"""

from __future__ import annotations

import logging

log = logging.getLogger("kvtransfer.sglang")

#: The backend's name on SGLang's command line.
BACKEND = "kvtransfer"
_MEMBER = "KVTRANSFER"
_TARGET = "sglang.srt.disaggregation.utils.get_kv_class"
_registered = False


def _add_enum_member(enum_cls, name: str, value: str):
    """Adds ``name = value`` to an existing Enum class (idempotent); returns the member."""
    existing = enum_cls._value2member_map_.get(value)
    if existing is not None:
        return existing
    member = object.__new__(enum_cls)
    member._name_ = name
    member._value_ = value
    member._sort_order_ = len(enum_cls._member_names_)
    enum_cls._member_map_[name] = member
    enum_cls._value2member_map_[value] = member
    enum_cls._member_names_.append(name)
    type.__setattr__(enum_cls, name, member)
    return member


def _get_kv_class_around(original, transfer_backend, class_type):
    from sglang.srt.disaggregation.utils import KVClassType

    # KVArgs is every backend's (the original answers it before looking at the backend).
    if getattr(transfer_backend, "value", transfer_backend) == BACKEND and class_type != KVClassType.KVARGS:
        from . import conn

        return {
            KVClassType.MANAGER: conn.KvtKVManager,
            KVClassType.SENDER: conn.KvtKVSender,
            KVClassType.RECEIVER: conn.KvtKVReceiver,
            KVClassType.BOOTSTRAP_SERVER: conn.KvtKVBootstrapServer,
        }[class_type]
    return original(transfer_backend, class_type)


def register() -> None:
    """Registers the ``kvtransfer`` backend with the SGLang in this process (idempotent).
    Raises ``ImportError`` where SGLang is not installed."""
    global _registered
    from sglang.srt.disaggregation import utils
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType
    from sglang.srt.server_args import add_disagg_transfer_backend_choices

    try:
        from sglang.srt.arg_groups.choices import DISAGG_TRANSFER_BACKEND_CHOICES as choices
    except ImportError:  # older layouts re-export it from server_args
        from sglang.srt.server_args import DISAGG_TRANSFER_BACKEND_CHOICES as choices
    if BACKEND not in choices:
        add_disagg_transfer_backend_choices([BACKEND])
    _add_enum_member(utils.TransferBackend, _MEMBER, BACKEND)
    if not _registered:
        HookRegistry.register(_TARGET, _get_kv_class_around, HookType.AROUND)
        _registered = True
    # load_plugins() applies hooks after the plugins ran; a direct call applies them now
    # (idempotent: a target already patched is skipped).
    HookRegistry.apply_hooks()
    log.debug("kvtransfer: SGLang backend %r registered", BACKEND)


def plugin() -> None:
    """Entry point of the ``sglang.srt.plugins`` group: registers the backend when SGLang is
    importable, and does nothing otherwise."""
    try:
        register()
    except ImportError as e:
        log.debug("kvtransfer: SGLang not usable here (%s); backend not registered", e)


__all__ = ["BACKEND", "plugin", "register"]
