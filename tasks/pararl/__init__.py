"""The pararl stage: the ParaRL driver (rounds, tables, checkpoints, resume) and the toy reward CLIP.

The RL math and the Ray actors live in rl/; flows/pararl.py drives this.
"""
