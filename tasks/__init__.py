"""The units of work the flows in flows/ call, one subpackage per pipeline stage.

aggregate/, traces/, sft/, pararl/, evaluate/ follow the stages in pipeline order; toy/ is the toy
world they all draw on, common/ the text tokenizer and checkpoint-folder inference several stages
share, pipeline/ the run's configuration, stage cache, progress bars and Prefect UI artifacts.
"""
