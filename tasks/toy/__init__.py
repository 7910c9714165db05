"""Procedural toy world with exact ground truth: the embedded default data source.

scene.py    presets, objects, scenes, describe() / parse_description()
render.py   scene -> image (PIL) and the exact image -> scene parser
tasks.py    edit / generation tasks, disjoint splits, sample_tasks()
teacher.py  reasoning traces (optional injected errors) and text scoring
"""
from tasks.toy.render import images_match, parse_image, render
from tasks.toy.scene import PRESETS, Scene, ToyObject, ToyPreset, describe, parse_description
from tasks.toy.tasks import CATEGORIES, EDIT_CATEGORIES, GENERATION_CATEGORIES, ToyTask, sample_tasks
from tasks.toy.teacher import Trace, text_correct, text_image_agreement, trace_result, write_trace

__all__ = ["CATEGORIES", "EDIT_CATEGORIES", "GENERATION_CATEGORIES", "PRESETS", "Scene", "ToyObject", "ToyPreset",
           "ToyTask", "Trace", "describe", "images_match", "parse_description", "parse_image", "render",
           "sample_tasks", "text_correct", "text_image_agreement", "trace_result", "write_trace"]
