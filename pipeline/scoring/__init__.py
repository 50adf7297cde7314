"""Per-clip scores: lip sync (SyncNet), speech, head pose, mouth/head motion, completeness.

Pure functions on arrays (frames, audio, landmarks, boxes); no Ray, no file layout. Each score
is defined in docs/scoring.md with its source. Import the submodules directly:

    from pipeline.scoring.syncnet import SyncNet, sync_scores, shift_audio
    from pipeline.scoring.speech import load_audio, speech_scores
    from pipeline.scoring.pose import pose_sequence, pose_stats
    from pipeline.scoring.motion import mouth_opening, mouth_activity, head_movement, completeness
"""
