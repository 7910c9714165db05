"""The traces stage: a reasoning trace per sample from a generator (toy teacher, vLLM, HTTP, Ray Data).

flows/traces.py drives it; tiny_qwen.py builds an offline Qwen2.5-VL folder the generators are tested on.
"""
