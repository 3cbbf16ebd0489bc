"""Built-in verifiable-reward tasks, one module per task.

``get_task(name, **kwargs)`` builds one by name (``task_names()`` lists them):

- ``kv_retrieval``: long-context key-value retrieval (RULER-style), exact match.
- ``arithmetic``: multi-digit ``a+b=`` (optionally ``-``, ``*``), exact integer match.
- ``gsm8k``: GSM8K word problems from a local JSONL file, final-answer match.
- ``worked_addition``: ``a+b=`` answered with the digit-by-digit work, then ``#`` and the sum.
"""

from jaxrl_geom.tasks.arithmetic import ArithmeticTask
from jaxrl_geom.tasks.base import Example, Task, get_task, register_task, task_names
from jaxrl_geom.tasks.gsm8k import GSM8KTask, extract_final_answer, gsm8k_reward
from jaxrl_geom.tasks.kv_retrieval import KVRetrievalTask
from jaxrl_geom.tasks.worked_addition import WorkedAdditionTask, addition_work

__all__ = [
    "ArithmeticTask",
    "Example",
    "GSM8KTask",
    "KVRetrievalTask",
    "Task",
    "WorkedAdditionTask",
    "addition_work",
    "extract_final_answer",
    "get_task",
    "gsm8k_reward",
    "register_task",
    "task_names",
]
