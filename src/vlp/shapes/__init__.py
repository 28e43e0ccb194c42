"""The shapes world, vlp's bundled dataset: scenes (`scene`), their language (`language`), the files every
reader and task takes (`world`), and the instruction task suite made from them (`instructions`)."""

from vlp.shapes.world import ShapesWorldConfig, make_shapes_world

__all__ = ["ShapesWorldConfig", "make_shapes_world"]
