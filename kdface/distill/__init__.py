"""Distillation objectives: loss terms with their contracts, the recipes (methods as data), and
the networks they train."""
from kdface.distill._networks import (DistillStudent, FaceNetwork, build_student, cast_floating,
                                      class_logits)
from kdface.distill._recipes import (HEAD, RECIPES, Option, Recipe, RecipeSpec, TeacherPhase,
                                     Term, TermDecl, build_recipe, objective, recipe_names,
                                     recipe_spec, register_option_defaults, register_recipe)
# The five papers' declarations register themselves into _recipes on import.
from kdface.distill import _paper_recipes  # noqa: E402,F401
# Methods beyond the five papers, each one module (its term and its declaration).
from kdface.distill import _adadistill, _ekd  # noqa: E402,F401
from kdface.distill._terms import (TERMS, StateShapes, TermInputs, TermSpec, TermState,
                                   register_term, term, term_spec)

__all__ = ["build_recipe", "build_student", "cast_floating", "class_logits", "DistillStudent",
           "FaceNetwork", "HEAD", "objective", "Option", "Recipe", "recipe_names", "recipe_spec",
           "RECIPES", "RecipeSpec", "register_option_defaults", "register_recipe",
           "register_term", "StateShapes", "TeacherPhase", "Term", "term", "term_spec",
           "TermDecl", "TermInputs", "TERMS", "TermSpec", "TermState"]
