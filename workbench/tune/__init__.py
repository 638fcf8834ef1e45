"""`workbench tune`: Optuna studies over engine settings, one server per trial."""
