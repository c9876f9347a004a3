"""One table for every method: the five papers and their baselines trained into the same
student from the same teacher, on the same data, budget and seeds, evaluated by the same code
as ``python -m kdface.evaluate``. Entry point: ``python -m kdface.compare``.
"""
from kdface.comparison._methods import METHODS, PAPERS, Method, method_names, select_methods
from kdface.comparison._report import build_report, markdown_report, write_comparison
from kdface.comparison._runner import (Comparison, enable_compilation_cache, row_fields,
                                       row_workdir, run_comparison, teacher_fields,
                                       train_command)
