"""The offline GRACE demo: a small but real vision-language task (grids of MNIST digits), a teacher, a student,
and RTN / QAT / QAT+KD / GRACE INT4 students evaluated through the packed INT4 deployment path."""
