"""The course: `python -m exercises list | start ID | check ID` (docs/course.md). Each exercise has the student
write one function of a script, in a copy of the script under work/, and checks it against the project's own
function (or, for an open exercise, against the properties it must have), then trains with it for a minute."""
