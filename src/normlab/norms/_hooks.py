"""Modules that a parent may skip on a fused path (normlab's norms, the registry's ReLU) and that tell the parent
when a module hook is registered on them or removed, so the parent decides then, once, whether it may fuse.

torch offers no public way to ask a module whether it has hooks, nor to learn that a hook was added or removed;
the public ways to add one are the module's own ``register_*_hook`` methods and a handle's ``remove()``. This
mixin overrides those five methods, keeps the ids of its live hooks and hands back a handle whose ``remove()``
also reports. Hooks put into torch's private hook dicts directly (or through ``nn.Module.register_forward_hook(m,
...)`` on the class) are not seen.
"""

from __future__ import annotations

import weakref
from typing import Any

from torch.utils.hooks import RemovableHandle


class HookWatched:
    """Mixin for an ``nn.Module`` (listed before it in the bases): owners that called :meth:`watch_hooks` get their
    ``decide_fusion()`` called whenever a forward / backward (pre-)hook is registered on this module or one of
    those hooks is removed. The owners are held weakly and are not copied or pickled with the module (an owner
    re-registers itself when it is copied or unpickled)."""

    def watch_hooks(self, owner: Any) -> None:
        owners = self.__dict__.get("_hook_owners")
        if owners is None:
            owners = self.__dict__["_hook_owners"] = weakref.WeakSet()
        owners.add(owner)

    def unwatch_hooks(self, owner: Any) -> None:
        self.__dict__.get("_hook_owners", set()).discard(owner)

    def has_hooks(self) -> bool:
        """Whether a forward / backward (pre-)hook registered through this module's methods is still live."""
        return bool(self.__dict__.get("_hook_ids"))

    def _hooks_changed(self) -> None:
        for owner in list(self.__dict__.get("_hook_owners", ())):
            owner.decide_fusion()

    def _track(self, handle: RemovableHandle) -> RemovableHandle:
        self.__dict__.setdefault("_hook_ids", set()).add(handle.id)
        self._hooks_changed()
        return _Handle(handle, self)

    def _untrack(self, hook_id: int) -> None:
        ids = self.__dict__.get("_hook_ids", set())
        if hook_id in ids:
            ids.discard(hook_id)
            self._hooks_changed()

    def register_forward_pre_hook(self, *args, **kwargs) -> RemovableHandle:
        return self._track(super().register_forward_pre_hook(*args, **kwargs))

    def register_forward_hook(self, *args, **kwargs) -> RemovableHandle:
        return self._track(super().register_forward_hook(*args, **kwargs))

    def register_full_backward_pre_hook(self, *args, **kwargs) -> RemovableHandle:
        return self._track(super().register_full_backward_pre_hook(*args, **kwargs))

    def register_full_backward_hook(self, *args, **kwargs) -> RemovableHandle:
        return self._track(super().register_full_backward_hook(*args, **kwargs))

    def register_backward_hook(self, *args, **kwargs) -> RemovableHandle:
        return self._track(super().register_backward_hook(*args, **kwargs))

    def __getstate__(self) -> dict:
        state = dict(super().__getstate__())
        state.pop("_hook_owners", None)  # weak references: neither copyable nor picklable
        return state


class _Handle(RemovableHandle):
    """torch's handle for one hook of a :class:`HookWatched` module (same id and dicts), whose ``remove()`` also
    tells the module, so its owners decide again."""

    def __init__(self, handle: RemovableHandle, module: HookWatched) -> None:
        self.__setstate__(handle.__getstate__())  # RemovableHandle's own copy protocol: its dicts and id
        self._module = weakref.ref(module)

    def remove(self) -> None:
        super().remove()
        module = self._module() if hasattr(self, "_module") else None  # None: an unpickled handle
        if module is not None:
            module._untrack(self.id)


__all__ = ["HookWatched"]
