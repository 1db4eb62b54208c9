"""The A-GEM table's metrics and rendering, against hand-computed values."""
from tools import agem_table


def test_scores_average_accuracy_and_forgetting_by_hand():
  # Rows: after each of 3 stages; columns: tasks. A_T = mean of the last row; F_T = mean over the first 2 tasks of
  # (best earlier score - final), in fractions.
  results = {'metrics': {'acc': [[90, 10, 10], [70, 95, 10], [60, 80, 97]]}}
  acc, forgetting = agem_table.scores(results)
  assert acc == (60 + 80 + 97) / 3
  assert abs(forgetting - ((90 - 60) + (95 - 80)) / 2 / 100) < 1e-12


def test_table_mean_std_and_published_columns():
  text = agem_table.table({'agem': [(89.0, 0.07, 300.0), (91.0, 0.05, 340.0)], 'joint': [(95.3, 0.001, 60.0)]})
  lines = text.splitlines()
  assert lines[2] == '| agem | 90.00 ± 1.41 | 0.060 ± 0.014 | 89.12 / 0.07 | 2 | 320 |'  # std with ddof=1.
  assert lines[3] == '| joint | 95.30 | 0.001 | 95.40 / — | 1 | 60 |'  # One seed: no spread.
