"""Detector stage: an ultralytics YOLO model that finds RBC, WBC and platelets in whole fields."""
