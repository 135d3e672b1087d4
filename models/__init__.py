"""edgedi.models: the model zoo, exact tiled execution, data and training.

Torch-free (the planner may import these): `edgedi.models.units` (units, ops, tile
geometry) and `edgedi.models.specs` (the zoo's architectures and `get_spec`).
Torch: `edgedi.models.zoo` (`build_model`) and `edgedi.models.tiling` (`run_tile`,
`run_partitioned`). This package imports nothing itself, so importing a torch-free
submodule never pulls torch in.
"""
