"""Distillation objectives: loss terms, the five papers' recipes, and the networks they train."""
from kdface.distill._networks import DistillStudent, FaceNetwork, build_student
from kdface.distill._recipes import RECIPES, Recipe, Term, build_recipe, objective
from kdface.distill._terms import TERMS, TermInputs
