"""Storage backends, one module each, behind the interface in `base`."""

from ..errors import InvalidArgument, NotFound
from ..parameters import TYPE
from .base import Backend


class Registry:
    """Finds the backend for a StorageClass `type` or for the prefix of a volume/snapshot id."""

    def __init__(self, backends: list[Backend], default_type: str = ""):
        self.backends = backends
        self.default_type = default_type
        self._by_type = {t: b for b in backends for t in b.types}

    def for_parameters(self, parameters: dict) -> tuple[Backend, str]:
        class_type = parameters.get(TYPE) or self.default_type
        if not class_type:
            raise InvalidArgument(f"the StorageClass has no 'type' parameter; set it to one of "
                                  f"{', '.join(sorted(self._by_type))}")
        backend = self._by_type.get(class_type)
        if backend is None:
            raise InvalidArgument(f"type {class_type!r} is not served by this plugin; it serves "
                                  f"{', '.join(sorted(self._by_type)) or 'nothing'}")
        return backend, class_type

    def for_id(self, object_id: str, what: str = "volume") -> Backend:
        for backend in self.backends:
            if backend.owns(object_id):
                return backend
        raise NotFound(f"{what} {object_id!r} does not exist (no polyvol backend here owns that id)")

    def types(self) -> list[str]:
        return sorted(self._by_type)
