"""The reconcile loop: desired state, observation, the pure planner, actions and their execution."""
