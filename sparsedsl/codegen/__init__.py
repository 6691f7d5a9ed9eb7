"""Stages 4 and 5 of the pipeline: ``plan_module`` decides from the IR what each template
needs (kernels per branch, walks over key blocks, predicates as Triton expressions), and
``render_module`` renders the jinja2 templates of the top-level ``codegen/templates/``
(found by ``frontend.resources.data_dir("templates")``) into one Python module of Triton
kernels; ``source_key`` names that module by what it depends on."""

from .plan import plan_module
from .render import render_module, source_key

__all__ = ["plan_module", "render_module", "source_key"]
