"""A user's task package, outside fedpipe: imported by name (`task = "user_task.task"`)."""
