"""Reference solutions of the open exercises, for teachers: each file holds the one function the exercise asks for,
with the docstring a student's copy starts from (`python -m exercises start ID` writes the signature and the
docstring; `start ID --solution` writes this whole function). The core exercises' solutions are the scripts'
own functions."""
