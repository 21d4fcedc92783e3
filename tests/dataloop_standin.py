"""The Dataloop stand-in lives in the package (`dl2ls.standin`: `make demo` runs against it too);
tests and benchmarks import it from here as they always have."""

from dl2ls.standin import DataloopStandIn, make_jwt  # noqa: F401
